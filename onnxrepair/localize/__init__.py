"""What to repair: conv filters to blame (DeepPatch, :mod:`.filters`), slices of weights that carry a property
(FMT, DARE, :mod:`.slices`), and blocks of the network (ArchRepair, :mod:`.blocks`)."""
