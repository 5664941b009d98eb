"""What people look at: round tables and plots."""
