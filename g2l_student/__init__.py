"""g2l stage two: cached teacher targets -> student training (Accelerate) -> export; evaluation."""
