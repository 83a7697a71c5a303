"""sglmesh services: gateway, tokenizer, router, history and worker, one process each."""
