"""The experiment spec: the pydantic model, arms × seeds expansion, search spaces, script arms."""
