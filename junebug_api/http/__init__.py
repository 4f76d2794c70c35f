"""The HTTP side: the server (limits, drain), the Klein resource, the API routes."""
