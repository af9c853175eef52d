"""Published numbers of the DACT paper to set beside a continual run.

Transcribed from shared/reference/PAPER_TABLES.md ("DACT Table 2: TIGER (T5) backbone",
"DACT Table 3: LC-Rec (Qwen2.5-1.5B-Instruct + LoRA) backbone" and Table 4) and kept here as
literals so that reports work where shared/ is absent. All metrics are fractions over the full
catalog with one relevant item per user; the paper's H@K (hit) equals recall@K in that
setting, hence the "recall@K" keys shared with results.json.

Three cells are odd in the paper and kept exactly as printed: Toys "Frozen tok + frozen GRM"
P4 N@10 = 0.0010 (below its own N@5 0.0070, impossible), Tools DACT P1 N@5 = 0.01453 (TIGER)
and Beauty LSAT P3 N@10 = 0.00102 (LC-Rec), each with one more digit than every other cell.
"""

# Paper row label of each method key of genrec_jax.methods.dact.METHOD_RULES.
METHOD_NAMES = {
    "frozen": "Frozen tok + frozen GRM",
    "ft_tok": "FT tok + frozen GRM",
    "ft_grm": "Frozen tok + FT GRM",
    "ft_both": "FT tok + FT GRM",
    "ft_tok_rt_grm": "FT tok + RT GRM",
    "reformer": "Reformer",
    "dact": "DACT",
    "lsat": "LSAT",
    "peso": "PESO",
    "pit": "PIT",  # not in the DACT paper: our row (genrec_jax.methods.pit.continual)
}

# DACT_TIGER[dataset][method][period] -> {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
# (paper columns H@5, H@10, N@5, N@10), periods 1..4; datasets keyed by config.data.name.
DACT_TIGER = {
  "toys": {
    "frozen": {
      1: {"recall@5": 0.0184, "recall@10": 0.0303, "ndcg@5": 0.0101, "ndcg@10": 0.0132},
      2: {"recall@5": 0.0154, "recall@10": 0.0229, "ndcg@5": 0.0083, "ndcg@10": 0.0102},
      3: {"recall@5": 0.0185, "recall@10": 0.0278, "ndcg@5": 0.0096, "ndcg@10": 0.0119},
      # N@10 0.0010 < N@5 0.0070 is impossible: a typo in the paper, kept as printed.
      4: {"recall@5": 0.0132, "recall@10": 0.0250, "ndcg@5": 0.0070, "ndcg@10": 0.0010},
    },
    "ft_tok": {
      1: {"recall@5": 0.0059, "recall@10": 0.0135, "ndcg@5": 0.0025, "ndcg@10": 0.0044},
      2: {"recall@5": 0.0048, "recall@10": 0.0089, "ndcg@5": 0.0025, "ndcg@10": 0.0035},
      3: {"recall@5": 0.0055, "recall@10": 0.0116, "ndcg@5": 0.0024, "ndcg@10": 0.0040},
      4: {"recall@5": 0.0075, "recall@10": 0.0135, "ndcg@5": 0.0029, "ndcg@10": 0.0045},
    },
    "ft_grm": {
      1: {"recall@5": 0.0159, "recall@10": 0.0260, "ndcg@5": 0.0103, "ndcg@10": 0.0136},
      2: {"recall@5": 0.0152, "recall@10": 0.0272, "ndcg@5": 0.0092, "ndcg@10": 0.0130},
      3: {"recall@5": 0.0282, "recall@10": 0.0398, "ndcg@5": 0.0176, "ndcg@10": 0.0214},
      4: {"recall@5": 0.0235, "recall@10": 0.0398, "ndcg@5": 0.0154, "ndcg@10": 0.0206},
    },
    "ft_both": {
      1: {"recall@5": 0.0176, "recall@10": 0.0305, "ndcg@5": 0.0117, "ndcg@10": 0.0159},
      2: {"recall@5": 0.0192, "recall@10": 0.0326, "ndcg@5": 0.0116, "ndcg@10": 0.0159},
      3: {"recall@5": 0.0284, "recall@10": 0.0456, "ndcg@5": 0.0185, "ndcg@10": 0.0240},
      4: {"recall@5": 0.0262, "recall@10": 0.0430, "ndcg@5": 0.0169, "ndcg@10": 0.0223},
    },
    "ft_tok_rt_grm": {
      1: {"recall@5": 0.0176, "recall@10": 0.0329, "ndcg@5": 0.0120, "ndcg@10": 0.0169},
      2: {"recall@5": 0.0159, "recall@10": 0.0252, "ndcg@5": 0.0100, "ndcg@10": 0.0130},
      3: {"recall@5": 0.0196, "recall@10": 0.0311, "ndcg@5": 0.0116, "ndcg@10": 0.0153},
      4: {"recall@5": 0.0248, "recall@10": 0.0389, "ndcg@5": 0.0160, "ndcg@10": 0.0205},
    },
    "reformer": {
      1: {"recall@5": 0.0188, "recall@10": 0.0301, "ndcg@5": 0.0127, "ndcg@10": 0.0163},
      2: {"recall@5": 0.0176, "recall@10": 0.0266, "ndcg@5": 0.0110, "ndcg@10": 0.0139},
      3: {"recall@5": 0.0240, "recall@10": 0.0382, "ndcg@5": 0.0154, "ndcg@10": 0.0200},
      4: {"recall@5": 0.0232, "recall@10": 0.0373, "ndcg@5": 0.0156, "ndcg@10": 0.0201},
    },
    "dact": {
      1: {"recall@5": 0.0208, "recall@10": 0.0353, "ndcg@5": 0.0140, "ndcg@10": 0.0186},
      2: {"recall@5": 0.0200, "recall@10": 0.0318, "ndcg@5": 0.0117, "ndcg@10": 0.0155},
      3: {"recall@5": 0.0309, "recall@10": 0.0523, "ndcg@5": 0.0197, "ndcg@10": 0.0267},
      4: {"recall@5": 0.0269, "recall@10": 0.0455, "ndcg@5": 0.0179, "ndcg@10": 0.0239},
    },
  },
  "beauty": {
    "frozen": {
      1: {"recall@5": 0.0279, "recall@10": 0.0443, "ndcg@5": 0.0151, "ndcg@10": 0.0192},
      2: {"recall@5": 0.0207, "recall@10": 0.0341, "ndcg@5": 0.0105, "ndcg@10": 0.0139},
      3: {"recall@5": 0.0172, "recall@10": 0.0268, "ndcg@5": 0.0086, "ndcg@10": 0.0111},
      4: {"recall@5": 0.0147, "recall@10": 0.0223, "ndcg@5": 0.0070, "ndcg@10": 0.0089},
    },
    "ft_tok": {
      1: {"recall@5": 0.0065, "recall@10": 0.0104, "ndcg@5": 0.0035, "ndcg@10": 0.0045},
      2: {"recall@5": 0.0049, "recall@10": 0.0106, "ndcg@5": 0.0020, "ndcg@10": 0.0034},
      3: {"recall@5": 0.0026, "recall@10": 0.0044, "ndcg@5": 0.0011, "ndcg@10": 0.0016},
      4: {"recall@5": 0.0041, "recall@10": 0.0092, "ndcg@5": 0.0019, "ndcg@10": 0.0031},
    },
    "ft_grm": {
      1: {"recall@5": 0.0274, "recall@10": 0.0469, "ndcg@5": 0.0162, "ndcg@10": 0.0226},
      2: {"recall@5": 0.0211, "recall@10": 0.0407, "ndcg@5": 0.0128, "ndcg@10": 0.0191},
      3: {"recall@5": 0.0293, "recall@10": 0.0524, "ndcg@5": 0.0185, "ndcg@10": 0.0259},
      4: {"recall@5": 0.0336, "recall@10": 0.0514, "ndcg@5": 0.0207, "ndcg@10": 0.0265},
    },
    "ft_both": {
      1: {"recall@5": 0.0270, "recall@10": 0.0483, "ndcg@5": 0.0169, "ndcg@10": 0.0237},
      2: {"recall@5": 0.0218, "recall@10": 0.0422, "ndcg@5": 0.0129, "ndcg@10": 0.0194},
      3: {"recall@5": 0.0328, "recall@10": 0.0547, "ndcg@5": 0.0200, "ndcg@10": 0.0270},
      4: {"recall@5": 0.0316, "recall@10": 0.0575, "ndcg@5": 0.0205, "ndcg@10": 0.0288},
    },
    "ft_tok_rt_grm": {
      1: {"recall@5": 0.0253, "recall@10": 0.0401, "ndcg@5": 0.0156, "ndcg@10": 0.0203},
      2: {"recall@5": 0.0208, "recall@10": 0.0378, "ndcg@5": 0.0125, "ndcg@10": 0.0180},
      3: {"recall@5": 0.0392, "recall@10": 0.0628, "ndcg@5": 0.0245, "ndcg@10": 0.0321},
      4: {"recall@5": 0.0321, "recall@10": 0.0534, "ndcg@5": 0.0198, "ndcg@10": 0.0267},
    },
    "reformer": {
      1: {"recall@5": 0.0285, "recall@10": 0.0483, "ndcg@5": 0.0171, "ndcg@10": 0.0235},
      2: {"recall@5": 0.0246, "recall@10": 0.0438, "ndcg@5": 0.0153, "ndcg@10": 0.0214},
      3: {"recall@5": 0.0328, "recall@10": 0.0544, "ndcg@5": 0.0212, "ndcg@10": 0.0281},
      4: {"recall@5": 0.0285, "recall@10": 0.0515, "ndcg@5": 0.0189, "ndcg@10": 0.0263},
    },
    "dact": {
      1: {"recall@5": 0.0299, "recall@10": 0.0531, "ndcg@5": 0.0191, "ndcg@10": 0.0266},
      2: {"recall@5": 0.0267, "recall@10": 0.0465, "ndcg@5": 0.0167, "ndcg@10": 0.0230},
      3: {"recall@5": 0.0398, "recall@10": 0.0605, "ndcg@5": 0.0250, "ndcg@10": 0.0316},
      4: {"recall@5": 0.0368, "recall@10": 0.0609, "ndcg@5": 0.0228, "ndcg@10": 0.0305},
    },
  },
  "tools": {
    "frozen": {
      1: {"recall@5": 0.0201, "recall@10": 0.0283, "ndcg@5": 0.0103, "ndcg@10": 0.0123},
      2: {"recall@5": 0.0188, "recall@10": 0.0285, "ndcg@5": 0.0102, "ndcg@10": 0.0126},
      3: {"recall@5": 0.0146, "recall@10": 0.0227, "ndcg@5": 0.0080, "ndcg@10": 0.0101},
      4: {"recall@5": 0.0128, "recall@10": 0.0191, "ndcg@5": 0.0069, "ndcg@10": 0.0084},
    },
    "ft_tok": {
      1: {"recall@5": 0.0045, "recall@10": 0.0067, "ndcg@5": 0.0019, "ndcg@10": 0.0025},
      2: {"recall@5": 0.0017, "recall@10": 0.0054, "ndcg@5": 0.0007, "ndcg@10": 0.0017},
      3: {"recall@5": 0.0025, "recall@10": 0.0050, "ndcg@5": 0.0013, "ndcg@10": 0.0019},
      4: {"recall@5": 0.0021, "recall@10": 0.0034, "ndcg@5": 0.0011, "ndcg@10": 0.0014},
    },
    "ft_grm": {
      1: {"recall@5": 0.0175, "recall@10": 0.0330, "ndcg@5": 0.0113, "ndcg@10": 0.0163},
      2: {"recall@5": 0.0224, "recall@10": 0.0312, "ndcg@5": 0.0132, "ndcg@10": 0.0160},
      3: {"recall@5": 0.0246, "recall@10": 0.0322, "ndcg@5": 0.0162, "ndcg@10": 0.0187},
      4: {"recall@5": 0.0178, "recall@10": 0.0310, "ndcg@5": 0.0110, "ndcg@10": 0.0152},
    },
    "ft_both": {
      1: {"recall@5": 0.0192, "recall@10": 0.0347, "ndcg@5": 0.0114, "ndcg@10": 0.0164},
      2: {"recall@5": 0.0196, "recall@10": 0.0315, "ndcg@5": 0.0123, "ndcg@10": 0.0162},
      3: {"recall@5": 0.0214, "recall@10": 0.0372, "ndcg@5": 0.0138, "ndcg@10": 0.0188},
      4: {"recall@5": 0.0205, "recall@10": 0.0317, "ndcg@5": 0.0130, "ndcg@10": 0.0166},
    },
    "ft_tok_rt_grm": {
      1: {"recall@5": 0.0134, "recall@10": 0.0231, "ndcg@5": 0.0082, "ndcg@10": 0.0113},
      2: {"recall@5": 0.0174, "recall@10": 0.0291, "ndcg@5": 0.0117, "ndcg@10": 0.0155},
      3: {"recall@5": 0.0158, "recall@10": 0.0230, "ndcg@5": 0.0101, "ndcg@10": 0.0125},
      4: {"recall@5": 0.0209, "recall@10": 0.0312, "ndcg@5": 0.0128, "ndcg@10": 0.0161},
    },
    "reformer": {
      1: {"recall@5": 0.0231, "recall@10": 0.0360, "ndcg@5": 0.0143, "ndcg@10": 0.0184},
      2: {"recall@5": 0.0213, "recall@10": 0.0317, "ndcg@5": 0.0141, "ndcg@10": 0.0175},
      3: {"recall@5": 0.0234, "recall@10": 0.0354, "ndcg@5": 0.0146, "ndcg@10": 0.0186},
      4: {"recall@5": 0.0205, "recall@10": 0.0314, "ndcg@5": 0.0124, "ndcg@10": 0.0158},
    },
    "dact": {
      # N@5 0.01453 has one digit more than the other cells: kept as printed.
      1: {"recall@5": 0.0239, "recall@10": 0.0414, "ndcg@5": 0.01453, "ndcg@10": 0.0201},
      2: {"recall@5": 0.0233, "recall@10": 0.0355, "ndcg@5": 0.0149, "ndcg@10": 0.0187},
      3: {"recall@5": 0.0255, "recall@10": 0.0380, "ndcg@5": 0.0164, "ndcg@10": 0.0204},
      4: {"recall@5": 0.0246, "recall@10": 0.0374, "ndcg@5": 0.0151, "ndcg@10": 0.0192},
    },
  },
}

# DACT_LCREC[dataset][method][period]: Table 3 (LC-Rec backbone), as DACT_TIGER; the paper
# runs LC-Rec on Beauty and Tools only.
DACT_LCREC = {
  "beauty": {
    "frozen": {
      1: {"recall@5": 0.0136, "recall@10": 0.0237, "ndcg@5": 0.0080, "ndcg@10": 0.0112},
      2: {"recall@5": 0.0096, "recall@10": 0.0186, "ndcg@5": 0.0055, "ndcg@10": 0.0084},
      3: {"recall@5": 0.0049, "recall@10": 0.0129, "ndcg@5": 0.0027, "ndcg@10": 0.0053},
      4: {"recall@5": 0.0079, "recall@10": 0.0141, "ndcg@5": 0.0050, "ndcg@10": 0.0069},
    },
    "ft_tok": {
      1: {"recall@5": 0.0042, "recall@10": 0.0064, "ndcg@5": 0.0022, "ndcg@10": 0.0028},
      2: {"recall@5": 0.0038, "recall@10": 0.0069, "ndcg@5": 0.0022, "ndcg@10": 0.0032},
      3: {"recall@5": 0.0011, "recall@10": 0.0023, "ndcg@5": 0.0006, "ndcg@10": 0.0010},
      4: {"recall@5": 0.0021, "recall@10": 0.0036, "ndcg@5": 0.0011, "ndcg@10": 0.0016},
    },
    "ft_grm": {
      1: {"recall@5": 0.0228, "recall@10": 0.0394, "ndcg@5": 0.0134, "ndcg@10": 0.0188},
      2: {"recall@5": 0.0100, "recall@10": 0.0198, "ndcg@5": 0.0058, "ndcg@10": 0.0089},
      3: {"recall@5": 0.0136, "recall@10": 0.0257, "ndcg@5": 0.0073, "ndcg@10": 0.0111},
      4: {"recall@5": 0.0183, "recall@10": 0.0334, "ndcg@5": 0.0109, "ndcg@10": 0.0157},
    },
    "ft_both": {
      1: {"recall@5": 0.0229, "recall@10": 0.0420, "ndcg@5": 0.0139, "ndcg@10": 0.0200},
      2: {"recall@5": 0.0215, "recall@10": 0.0431, "ndcg@5": 0.0125, "ndcg@10": 0.0194},
      3: {"recall@5": 0.0245, "recall@10": 0.0486, "ndcg@5": 0.0148, "ndcg@10": 0.0225},
      4: {"recall@5": 0.0319, "recall@10": 0.0545, "ndcg@5": 0.0194, "ndcg@10": 0.0267},
    },
    "lsat": {
      1: {"recall@5": 0.0177, "recall@10": 0.0294, "ndcg@5": 0.0109, "ndcg@10": 0.0147},
      2: {"recall@5": 0.0106, "recall@10": 0.0198, "ndcg@5": 0.0065, "ndcg@10": 0.0102},
      # N@10 0.00102 has one digit more than its neighbours: kept as printed.
      3: {"recall@5": 0.0106, "recall@10": 0.0219, "ndcg@5": 0.0065, "ndcg@10": 0.00102},
      4: {"recall@5": 0.0172, "recall@10": 0.0314, "ndcg@5": 0.0110, "ndcg@10": 0.0155},
    },
    "peso": {
      1: {"recall@5": 0.0211, "recall@10": 0.0347, "ndcg@5": 0.0128, "ndcg@10": 0.0171},
      2: {"recall@5": 0.0183, "recall@10": 0.0351, "ndcg@5": 0.0110, "ndcg@10": 0.0163},
      3: {"recall@5": 0.0109, "recall@10": 0.0256, "ndcg@5": 0.0063, "ndcg@10": 0.0110},
      4: {"recall@5": 0.0214, "recall@10": 0.0362, "ndcg@5": 0.0125, "ndcg@10": 0.0172},
    },
    "reformer": {
      1: {"recall@5": 0.0215, "recall@10": 0.0428, "ndcg@5": 0.0119, "ndcg@10": 0.0187},
      2: {"recall@5": 0.0100, "recall@10": 0.0257, "ndcg@5": 0.0047, "ndcg@10": 0.0096},
      3: {"recall@5": 0.0202, "recall@10": 0.0389, "ndcg@5": 0.0111, "ndcg@10": 0.0170},
      4: {"recall@5": 0.0272, "recall@10": 0.0455, "ndcg@5": 0.0166, "ndcg@10": 0.0224},
    },
    "dact": {
      1: {"recall@5": 0.0262, "recall@10": 0.0477, "ndcg@5": 0.0157, "ndcg@10": 0.0225},
      2: {"recall@5": 0.0239, "recall@10": 0.0440, "ndcg@5": 0.0144, "ndcg@10": 0.0209},
      3: {"recall@5": 0.0270, "recall@10": 0.0546, "ndcg@5": 0.0165, "ndcg@10": 0.0253},
      4: {"recall@5": 0.0300, "recall@10": 0.0576, "ndcg@5": 0.0189, "ndcg@10": 0.0279},
    },
  },
  "tools": {
    "frozen": {
      1: {"recall@5": 0.0125, "recall@10": 0.0207, "ndcg@5": 0.0082, "ndcg@10": 0.0108},
      2: {"recall@5": 0.0112, "recall@10": 0.0203, "ndcg@5": 0.0074, "ndcg@10": 0.0103},
      3: {"recall@5": 0.0095, "recall@10": 0.0169, "ndcg@5": 0.0059, "ndcg@10": 0.0083},
      4: {"recall@5": 0.0109, "recall@10": 0.0173, "ndcg@5": 0.0068, "ndcg@10": 0.0089},
    },
    "ft_tok": {
      1: {"recall@5": 0.0038, "recall@10": 0.0062, "ndcg@5": 0.0024, "ndcg@10": 0.0031},
      2: {"recall@5": 0.0033, "recall@10": 0.0058, "ndcg@5": 0.0021, "ndcg@10": 0.0029},
      3: {"recall@5": 0.0024, "recall@10": 0.0042, "ndcg@5": 0.0015, "ndcg@10": 0.0020},
      4: {"recall@5": 0.0027, "recall@10": 0.0046, "ndcg@5": 0.0017, "ndcg@10": 0.0023},
    },
    "ft_grm": {
      1: {"recall@5": 0.0157, "recall@10": 0.0269, "ndcg@5": 0.0102, "ndcg@10": 0.0138},
      2: {"recall@5": 0.0147, "recall@10": 0.0246, "ndcg@5": 0.0093, "ndcg@10": 0.0124},
      3: {"recall@5": 0.0110, "recall@10": 0.0194, "ndcg@5": 0.0061, "ndcg@10": 0.0088},
      4: {"recall@5": 0.0050, "recall@10": 0.0123, "ndcg@5": 0.0028, "ndcg@10": 0.0052},
    },
    "ft_both": {
      1: {"recall@5": 0.0214, "recall@10": 0.0310, "ndcg@5": 0.0134, "ndcg@10": 0.0165},
      2: {"recall@5": 0.0162, "recall@10": 0.0276, "ndcg@5": 0.0100, "ndcg@10": 0.0136},
      3: {"recall@5": 0.0218, "recall@10": 0.0333, "ndcg@5": 0.0146, "ndcg@10": 0.0183},
      4: {"recall@5": 0.0214, "recall@10": 0.0360, "ndcg@5": 0.0134, "ndcg@10": 0.0181},
    },
    "lsat": {
      1: {"recall@5": 0.0153, "recall@10": 0.0259, "ndcg@5": 0.0088, "ndcg@10": 0.0123},
      2: {"recall@5": 0.0146, "recall@10": 0.0237, "ndcg@5": 0.0083, "ndcg@10": 0.0113},
      3: {"recall@5": 0.0121, "recall@10": 0.0189, "ndcg@5": 0.0098, "ndcg@10": 0.0125},
      4: {"recall@5": 0.0157, "recall@10": 0.0264, "ndcg@5": 0.0101, "ndcg@10": 0.0135},
    },
    "peso": {
      1: {"recall@5": 0.0183, "recall@10": 0.0285, "ndcg@5": 0.0116, "ndcg@10": 0.0149},
      2: {"recall@5": 0.0162, "recall@10": 0.0244, "ndcg@5": 0.0103, "ndcg@10": 0.0130},
      3: {"recall@5": 0.0097, "recall@10": 0.0193, "ndcg@5": 0.0059, "ndcg@10": 0.0089},
      4: {"recall@5": 0.0160, "recall@10": 0.0287, "ndcg@5": 0.0100, "ndcg@10": 0.0140},
    },
    "reformer": {
      1: {"recall@5": 0.0164, "recall@10": 0.0300, "ndcg@5": 0.0102, "ndcg@10": 0.0146},
      2: {"recall@5": 0.0114, "recall@10": 0.0205, "ndcg@5": 0.0072, "ndcg@10": 0.0101},
      3: {"recall@5": 0.0121, "recall@10": 0.0223, "ndcg@5": 0.0067, "ndcg@10": 0.0100},
      4: {"recall@5": 0.0130, "recall@10": 0.0275, "ndcg@5": 0.0070, "ndcg@10": 0.0117},
    },
    "dact": {
      1: {"recall@5": 0.0226, "recall@10": 0.0364, "ndcg@5": 0.0152, "ndcg@10": 0.0196},
      2: {"recall@5": 0.0181, "recall@10": 0.0325, "ndcg@5": 0.0109, "ndcg@10": 0.0155},
      3: {"recall@5": 0.0209, "recall@10": 0.0372, "ndcg@5": 0.0136, "ndcg@10": 0.0188},
      4: {"recall@5": 0.0246, "recall@10": 0.0355, "ndcg@5": 0.0147, "ndcg@10": 0.0181},
    },
  },
}

# DACT Table 4 (Tools): code-assignment change rate per level, averaged over periods, keyed by
# the paper's row label. The "various rho / lambda" row is a (low, high) range over settings.
DACT_TABLE4_TOOLS = {
    "naive fine-tuning": {"level_1": 0.7052, "level_2": 0.9696, "level_3": 0.9892,
                          "overall": 0.9999},
    "DACT (various rho / lambda)": {"level_1": (0.133, 0.459), "level_2": (0.124, 0.444),
                                    "level_3": (0.130, 0.452), "overall": (0.133, 0.459)},
    "DACT default (rho = 0.3)": {"level_1": 0.2975, "level_2": 0.2812, "level_3": 0.2918,
                                 "overall": 0.2975},
}
