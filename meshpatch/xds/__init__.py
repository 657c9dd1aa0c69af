"""The xDS client: bootstrap → transport → resource cache and watchers."""
