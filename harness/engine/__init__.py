"""One run: data, teacher (trained once, cached), student, KD method, fit, evaluate, log."""
