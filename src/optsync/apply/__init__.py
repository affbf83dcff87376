"""Apply (Lambda's role): mapping rules turn change events into endpoint writes."""
