"""Teacher selection: per-checkpoint measures and information estimates (`analysis`, `info`), the criteria and tie
sets that pick T* (`criteria`), and the analysis plots (`plots`)."""
