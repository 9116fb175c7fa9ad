"""Path patching (3-step, MLPs recompute, attention outputs frozen): the naive definition, the exact fast
algorithm, and the attribution screen. SPEC §2, §10."""
