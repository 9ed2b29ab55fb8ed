"""Training recipes (schema, loading, validation), strategies and parallelisation, and the train verb."""
