"""Who a client is: API keys (hashed at rest) and the client identity every request carries."""
