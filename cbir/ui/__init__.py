"""The Gradio page over `retrieval.query.Querier`."""
