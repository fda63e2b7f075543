"""Virby's supervisor side: config, circus ini, launchd plist, CLI and control client."""
