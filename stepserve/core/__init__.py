"""What decides: requests, the block manager, the scheduler and the step loop. No torch here."""
