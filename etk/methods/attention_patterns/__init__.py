"""`method=attention_patterns`: where a circuit's heads look (attention probabilities from their role to the task's roles)."""
