"""The HTTP server: OpenAI and KServe protocols on the async engine."""
