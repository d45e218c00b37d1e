"""The edge: HTTP front door that publishes requests onto the bus and relays their events."""
