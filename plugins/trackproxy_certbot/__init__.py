"""certbot plugin for trackproxy: HTTP-01 through the running proxy, deployment into its state_dir."""
