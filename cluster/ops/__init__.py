"""Operations: the metrics catalogue and recorders (Prometheus through Ray), link calibration on racks."""
