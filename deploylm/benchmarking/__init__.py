"""The benchmark harness behind `deploylm bench` (DESIGN.md §9); the public names live in deploylm.bench."""
