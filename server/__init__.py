"""The HTTP serving layer (evaluation level): OpenAI protocol, scheduler thread, metrics, the FastAPI app.

Entry point: server.py (a package directory wins over the same-named module on import, so `import server` from
anywhere in the repository means this package)."""
