"""What several methods share: folding scales into weights, frozen parameters, Gram matrices."""
