"""What talks to the world: the offline LLM, output processing (detokenizer, stop strings),
the async front and the engine process with its supervisor."""
