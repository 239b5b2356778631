"""Built-in CLI commands registered through the tao_register_commands hook."""
