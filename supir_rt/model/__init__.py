"""The reference SUPIR networks, with module names equal to the official checkpoint keys."""
