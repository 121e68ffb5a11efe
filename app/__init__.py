"""The app layer, on top of the library: the `personaagent` command line, the serving library
(`PersonaService`) and its HTTP API. It composes the program (answering, memory) with the
optimizers (alignment, MLflow); nothing below it imports it."""
