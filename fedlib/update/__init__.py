"""What a client's update passes through on its way out and in: the filter chain and its checks."""
