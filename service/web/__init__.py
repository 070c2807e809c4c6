"""The browser client served at ``GET /`` (plain HTML and JavaScript, no build step)."""
