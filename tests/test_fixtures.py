"""The shared tiny models load back with transformers and generate."""
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer


def test_tiny_models_roundtrip(tiny_gpt2_dir, tiny_llama_dir, tiny_t5_dir):
    for path, auto in [(tiny_gpt2_dir, AutoModelForCausalLM), (tiny_llama_dir, AutoModelForCausalLM),
                       (tiny_t5_dir, AutoModelForSeq2SeqLM)]:
        tok = AutoTokenizer.from_pretrained(path)
        model = auto.from_pretrained(path).eval()
        ids = tok(["the quick brown fox"], return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out.shape[0] == 1 and out.shape[1] >= 2
        assert model.config.vocab_size == len(tok)
