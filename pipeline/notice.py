"""The research-use notice every output of the study path carries (CSVs, JSON, the DICOM SR, the web page)."""
NOTICE = "Research use only - not for clinical use."
