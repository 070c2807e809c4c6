"""The HTTP layer: routes, protocol models, serving logic, SSE framing and errors."""
