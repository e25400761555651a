"""replace_dir: the new folder takes the target's place, the old one is gone, and where the system
has renameat2 the swap is one step (no moment without a target)."""
import os
import sys

import pytest

from deploylm import fsutil


def make(folder, text):
    folder.mkdir()
    (folder / "file.txt").write_text(text)
    return folder


def test_replace_dir_into_an_empty_place(tmp_path):
    new = make(tmp_path / ".new", "new")
    fsutil.replace_dir(new, tmp_path / "out")
    assert (tmp_path / "out" / "file.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_replace_dir_over_an_existing_folder_leaves_only_the_new_one(tmp_path, monkeypatch, atomic):
    if not atomic:
        monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    elif not fsutil.exchange(make(tmp_path / "a", "a"), make(tmp_path / "b", "b")):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    else:
        assert (tmp_path / "a" / "file.txt").read_text() == "b"        # really swapped
        for name in ("a", "b"):
            fsutil.shutil.rmtree(tmp_path / name)
    old = make(tmp_path / "out", "old")
    (old / "only-old.txt").write_text("x")
    fsutil.replace_dir(make(tmp_path / ".new", "new"), tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(tmp_path / "out")) == ["file.txt"] and (tmp_path / "out" / "file.txt").read_text() == "new"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_is_used_on_linux_so_the_target_never_disappears(tmp_path, monkeypatch):
    """With exchange working, replace_dir never renames the target away (the fallback's gap)."""
    if not fsutil.exchange(make(tmp_path / "a", "a"), make(tmp_path / "b", "b")):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this filesystem")
    target = make(tmp_path / "out", "old")
    renamed_away = []
    real_replace = os.replace
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (renamed_away.append((a, b)), real_replace(a, b)))
    fsutil.replace_dir(make(tmp_path / ".new", "new"), target)
    assert renamed_away == [] and (target / "file.txt").read_text() == "new"


def test_exchange_of_a_missing_path_is_an_error(tmp_path):
    if fsutil._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    with pytest.raises(OSError):
        fsutil.exchange(tmp_path / "missing", make(tmp_path / "b", "b"))


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_carry_over_keeps_the_old_folders_extra_entries(tmp_path, monkeypatch, atomic):
    if not atomic:
        monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    old = make(tmp_path / "out", "old")
    (old / "metrics.json").write_text("{}")
    fsutil.replace_dir(make(tmp_path / ".new", "new"), old, carry_over=True)
    assert sorted(os.listdir(old)) == ["file.txt", "metrics.json"] and (old / "file.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "two-renames"])
def test_carried_over_entries_are_in_the_new_folder_before_the_swap(tmp_path, monkeypatch, atomic):
    """A checkpoint save carries the run folder's other entries (metrics.json, tokenizer_config.json, folders)
    over. They were moved in after the swap, so a SIGKILL between the swap and the moves left a run
    without them (and them in a `.old-` folder the next save deleted); now the new folder holds them
    (hard links, no data copied) when it takes the target's place."""
    old = make(tmp_path / "out", "old")
    (old / "metrics.json").write_text("{}")
    (old / "extra").mkdir()
    (old / "extra" / "notes.txt").write_text("kept")
    new = make(tmp_path / ".new", "new")
    seen = []
    if atomic:
        real = fsutil.exchange
        if not real(make(tmp_path / "a", "a"), make(tmp_path / "b", "b")):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
        for name in ("a", "b"):
            fsutil.shutil.rmtree(tmp_path / name)
        monkeypatch.setattr(fsutil, "exchange", lambda a, b: (seen.append(sorted(os.listdir(a))), real(a, b))[1])
    else:
        monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
        real_replace = os.replace
        monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (
            seen.append(sorted(os.listdir(a))) if str(a) == str(new) else None, real_replace(a, b))[1])
    fsutil.replace_dir(new, old, carry_over=True)
    assert seen == [["extra", "file.txt", "metrics.json"]]
    assert (old / "extra" / "notes.txt").read_text() == "kept" and (old / "metrics.json").read_text() == "{}"
    assert (old / "file.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_carry_over_copies_where_hard_links_fail(tmp_path, monkeypatch):
    old = make(tmp_path / "out", "old")
    (old / "metrics.json").write_text("{}")

    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fsutil.os, "link", no_links)
    fsutil.replace_dir(make(tmp_path / ".new", "new"), old, carry_over=True)
    assert (old / "metrics.json").read_text() == "{}" and (old / "file.txt").read_text() == "new"


def test_the_precision_steps_scratch_is_cleaned_like_the_export_folder(tmp_path):
    """A SIGKILLed quantizing export left `..<name>.tmp-...precision-XXXX` (690 MB for SmolLM2) that no
    later export removed; its scratch is now named so that the next export of the folder removes it."""
    import os

    from deploylm.export.precision_step import _scratch_beside
    from deploylm.fsutil import remove_stale_temporaries, temporary_sibling

    target = tmp_path / "smollm2-int8"
    tmp_dir = temporary_sibling(target)
    tmp_dir.mkdir()
    with _scratch_beside(tmp_dir) as scratch:
        assert scratch.parent == tmp_path and scratch.name.endswith(f".precision-{os.getpid()}")
        assert remove_stale_temporaries(target) == []             # this process is alive: kept
        assert scratch.is_dir()
    assert not scratch.exists()
    dead = tmp_path / f".{target.name}.tmp-0123abcd-999999999.precision-999999999"   # a killed export's
    dead.mkdir()
    assert dead in remove_stale_temporaries(target) and not dead.exists()


def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    """`deploylm attention --out a.png` writes `.a.png.tmp-<random>-<pid>`: a kill -9 left it behind for good;
    the next write of a.png removes it, and never a file of a writer still running."""
    import os

    from deploylm.fsutil import remove_stale_temporaries, temporary_sibling

    target = tmp_path / "a.png"
    dead = tmp_path / ".a.png.tmp-0123abcd-999999999"
    live = temporary_sibling(target)
    other = tmp_path / ".b.png.tmp-0123abcd-999999999"               # another output's: not this target's
    for path in (dead, live, other):
        path.write_bytes(b"\x89PNG")
    assert live.name.endswith(f"-{os.getpid()}")
    assert remove_stale_temporaries(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


def test_json_finite_replaces_nan_and_both_infinities_at_any_depth():
    """Standard JSON has no NaN / Infinity: every non-finite float becomes null, in dicts, lists and tuples;
    everything else is kept as it is."""
    import json

    inf = float("inf")
    value = {"a": [1.5, float("nan"), (inf, -inf)], "b": {"c": -inf, "d": 0}, "e": "inf", "f": None, "g": True}
    assert fsutil.json_finite(value) == {"a": [1.5, None, [None, None]], "b": {"c": None, "d": 0}, "e": "inf",
                                         "f": None, "g": True}
    json.dumps(fsutil.json_finite(value), allow_nan=False)


def test_check_output_file_takes_the_suffix_in_any_case(tmp_path):
    assert fsutil.check_output_file(tmp_path / "plot.PNG", "--plot", ".png") == tmp_path / "plot.PNG"
    with pytest.raises(fsutil.UsageError, match=r"--plot '.*plot\.svg': expected a file name ending in \.png"):
        fsutil.check_output_file(tmp_path / "plot.svg", "--plot", ".png")


def test_a_mount_point_is_refused_as_an_output_folder(tmp_path, monkeypatch):
    """A command's output folder is replaced by a rename from beside it, which fails (EBUSY, EXDEV) on a mount point
    (a separate disk, a container's volume): export into one ran to its end, then raised OSError's traceback from
    fsutil.exchange; train and distill failed at their first save."""
    out = tmp_path / "volume"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(fsutil.os.path, "ismount", lambda path: os.fspath(path) == os.fspath(out) or real(path))
    for force in (False, True):
        with pytest.raises(fsutil.UsageError) as err:
            fsutil.check_output_folder(out, force, holds="the artifact", ours=lambda folder: True, not_ours="",
                                       without_force="")
        assert str(err.value).startswith(f"--out {str(out)!r} is a mount point: the artifact is written beside it"), err.value
    fsutil.check_output_folder(out / "out", False, holds="the artifact", ours=lambda folder: True, not_ours="",
                               without_force="")          # a folder inside it is fine


def test_a_name_too_long_for_the_temporary_folder_is_refused_before_any_work(tmp_path):
    """A name the file system takes, but not inside '.<name>.tmp-<8 hex>-<pid>', passed the checks and failed after
    the model load with 'File name too long' naming the temporary folder."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    check = dict(holds="the artifact", ours=lambda folder: True, not_ours="", without_force="")
    longest = tmp_path / ("a" * (limit - 22))
    fsutil.check_output_folder(longest, False, **check)
    folder = fsutil.temporary_sibling(longest)
    folder.mkdir()                                         # the name the writer uses does fit
    too_long = tmp_path / ("a" * (limit - 21))
    with pytest.raises(fsutil.UsageError) as err:
        fsutil.check_output_folder(too_long, False, **check)
    assert str(err.value) == (f"--out {str(too_long)!r}: its name is {limit - 21} bytes, and it is written first as "
                              f"'.<name>.tmp-...' beside it, which must fit the file system's {limit}: use a name of "
                              f"at most {limit - 22} bytes")


def test_a_temporary_of_another_users_live_writer_is_kept(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's process raises PermissionError: that writer is alive, and its
    temporary folder must not be deleted under it (the tests run as root, so the refusal is simulated)."""
    live = tmp_path / ".out.tmp-0123abcd-4242"
    live.mkdir()

    def not_yours(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fsutil.os, "kill", not_yours)
    assert fsutil.remove_stale_temporaries(tmp_path / "out") == [] and live.is_dir()


@pytest.mark.parametrize("errno", [38, 22, 95, 1], ids=["ENOSYS", "EINVAL", "EOPNOTSUPP", "EPERM"])
def test_a_system_that_refuses_the_exchange_falls_back_to_two_renames(tmp_path, monkeypatch, errno):
    """renameat2 exists but the kernel or file system refuses RENAME_EXCHANGE (old kernels: ENOSYS; file
    systems without it: EINVAL or EOPNOTSUPP; some sandboxes: EPERM): the swap takes the fallback path."""
    monkeypatch.setattr(fsutil, "_RENAMEAT2", lambda *args: -1)
    monkeypatch.setattr(fsutil.ctypes, "get_errno", lambda: errno)
    make(tmp_path / "out", "old")
    fsutil.replace_dir(make(tmp_path / ".new", "new"), tmp_path / "out")
    assert (tmp_path / "out" / "file.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_run_folders_json_written_again_removes_a_killed_writers_temporary(tmp_path):
    """A SIGKILL while metrics.json (or cleaning.json) was being written left `.metrics.json.tmp-PID` in the run
    folder, and every later checkpoint save carried it over; the next write of that file removes it."""
    from deploylm.training.outdir import write_json

    dead = tmp_path / ".metrics.json.tmp-999999999"
    dead.write_text("{")
    running = tmp_path / f".metrics.json.tmp-{os.getppid()}"         # a live writer's: left alone
    running.write_text("{")
    write_json(tmp_path / "metrics.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["metrics.json", running.name])
