"""etk.models"""
