"""Pure model code (Flax NNX). Speaks logical axis names only, never a mesh."""
