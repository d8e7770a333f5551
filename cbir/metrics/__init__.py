"""Metrics: ranking metrics of retrieval, evaluation pictures, and the EDA report of a prepared run."""
