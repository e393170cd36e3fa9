"""pytest plugin recording tests as Jumpstarter results."""
