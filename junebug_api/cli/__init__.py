"""The console scripts: junebug-api-replay and junebug-api-import-channels."""
