"""`method=causal_impact`: the fine-tuned circuit's heads scored in both members, shared vs added heads."""
