"""The WebUI Forge host adapter (the Forge2 backend, `backend/`)."""
