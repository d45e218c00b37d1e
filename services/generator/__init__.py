"""The generator: consumes generation requests and streams the backend's tokens as events."""
