"""Pure-PyTorch twins of every op: ``naive_*`` per-token recurrences (the test oracle) and
``chunk_*`` matrix forms (the CPU training path). fp32 accumulation throughout."""
