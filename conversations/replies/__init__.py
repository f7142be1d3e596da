"""A reply's life in one place (moving here module by module; see DESIGN.md):
`liveness` is the first: heartbeat, staleness, the sweep, and the one *interrupted* write."""
