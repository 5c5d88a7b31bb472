"""The public Search API: embeds a query through Serving and asks the indexer for its neighbours."""
