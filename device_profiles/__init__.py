"""Device profile YAML files, shipped as package data so installed runtimes find them."""
