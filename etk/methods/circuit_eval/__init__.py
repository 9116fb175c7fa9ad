"""Circuit evaluation under position-wise mean ablation (SPEC §3): faithfulness, completeness, minimality."""
