"""`llmkit serve`: a warm model behind the OpenAI API.

engine.py decodes every request in flight together (continuous batching over one KV cache);
sampling.py turns one row of logits into a token; schemas.py and errors.py are the API's shapes;
app.py holds thin FastAPI routes; server.py runs uvicorn with llmkit's signals and ready line.
"""
