"""`cbir serve`: the search service other programs call over HTTP (FastAPI on uvicorn), with the page beside it."""
