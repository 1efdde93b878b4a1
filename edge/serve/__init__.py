"""`xray-edge serve`: receive films (DICOM C-STORE, a watched folder), spool them durably,
classify each through the library's classify path, write results, reports and drift warnings.

Needs the optional ``[serve]`` extra for DICOM networking (pynetdicom) and DICOM reports (pydicom).
"""
