"""Shared fixtures come from the eventcore pytest plugin (eventcore.testing._plugin)."""
