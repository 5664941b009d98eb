"""What crosses a trust boundary: keys, the sealed envelope, the one decode boundary, storage and the sealed stores."""
