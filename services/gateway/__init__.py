"""The OpenAI-compatible HTTP facade; translates to the tokenizer, router and history services."""
