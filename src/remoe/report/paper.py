"""The paper's reported numbers (Wang et al., ICLR 2025: Tables 2, 3, 5-7 and Figs. 4-6), for labelled
comparison rows only, never as test expectations."""

SETTING = "paper: 182M active, The Pile, 30B tokens"
# The λ0 / α sensitivity tables come from shorter runs: their standard point (λ0=1e-8, α=1.2) reads 2.032,
# against 1.921 for the same setting after 30B tokens; the paper does not state their length
SENSITIVITY_SETTING = "paper: 182M active, The Pile, its shorter sensitivity runs (length not stated; 2.032 vs 1.921 at 30B)"
TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "piqa", "race"]

# Table 2 (182M, E=8, k=1): downstream accuracy (%) in TASKS order, keyed by our method names (the
# paper's dMoE is our topk); Lory and SparseMixer-v2 are not implemented here (the report says so)
ROUTING = {"dense": [19.45, 43.35, 54.40, 28.61, 31.09, 61.97, 28.52],
           "hash": [19.28, 45.45, 54.95, 29.68, 31.44, 63.06, 27.66],
           "lory": [20.31, 42.97, 49.54, 28.75, 32.35, 62.24, 27.75],
           "sparsemixer-v2": [19.80, 46.72, 45.96, 30.24, 34.12, 62.89, 29.00],
           "ec": [18.86, 42.97, 60.21, 29.14, 29.26, 61.92, 27.37],
           "topk": [20.05, 45.16, 57.83, 29.83, 32.97, 63.55, 28.33],
           "remoe": [20.22, 46.68, 54.16, 30.26, 35.94, 63.55, 29.38]}
# Validation loss after 30B tokens
VAL_N = {"dense": {"182m": 2.042, "469m": 1.886, "978m": 1.822}, "topk": {"182m": 1.936, "469m": 1.796, "978m": 1.730},
         "remoe": {"182m": 1.921, "469m": 1.773, "978m": 1.715}}
VAL_E = {"topk": dict(zip([4, 8, 16, 32, 64, 128], [1.971, 1.936, 1.907, 1.874, 1.854, 1.852])),
         "remoe": dict(zip([4, 8, 16, 32, 64, 128], [1.961, 1.921, 1.883, 1.852, 1.826, 1.815]))}
VAL_G = {"topk": dict(zip([1, 2, 4, 8, 16, 32, 64], [1.936, 1.912, 1.899, 1.898, 1.895, 1.893, 1.885])),
         "remoe": dict(zip([1, 2, 4, 8, 16, 32, 64], [1.921, 1.902, 1.896, 1.885, 1.879, 1.872, 1.872]))}
VAL_DENSE, VAL_DENSE_X8 = 2.042, 1.873
LAMBDA0 = {1e-16: (2.031, 138), 1e-12: (2.029, 136), 1e-8: (2.032, 110), 1e-4: (2.036, 55), 1.0: (2.032, 92)}
ALPHA = {1.05: (2.033, 414), 1.1: (2.028, 211), 1.2: (2.032, 110), 1.3: (2.029, 80), 1.5: (2.057, 52)}
# Load-balancing ablation: downstream average (%)
LB_AVG = {("topk", "no"): 37.67, ("topk", "yes"): 39.67, ("remoe", "no"): 39.52, ("remoe", "yes"): 40.03}
# Table 7: train / infer TFLOPS (TP=1)
THROUGHPUT = {"182m": {"topk": (103.49, 78.47), "remoe": (105.38, 80.19)},
              "469m": {"topk": (138.58, 107.52), "remoe": (136.69, 111.71)},
              "978m": {"topk": (160.46, 153.11), "remoe": (157.61, 152.76)}}
