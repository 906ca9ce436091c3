"""placeholder replaced below"""
def bind_namespaces(runtime):
    pass
