"""The typed run config (schemas), the values derived from it, and the machine it runs on."""
